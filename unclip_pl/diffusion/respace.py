"""Choosing a subset of the training timesteps for faster sampling."""


def space_timesteps(num_steps: int, spec) -> list[int]:
    """Timestep indices (sorted ascending, unique) to keep out of 0..num_steps-1.

    Args:
        num_steps: T, the number of steps of the original schedule.
        spec: one of
            - int N (or a digit string "N"): N evenly spaced steps, rounded, always including 0 and T-1;
            - "ddimN": the DDIM paper's spacing, range(0, T, stride) with the integer stride giving exactly N steps
              (does not in general include T-1);
            - a list/tuple of ints: exactly those steps.
    Returns:
        list[int] of length N.
    """
    if isinstance(spec, str):
        if spec.startswith("ddim"):
            n = int(spec[len("ddim"):])
            for stride in range(1, num_steps + 1):
                if len(range(0, num_steps, stride)) == n:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot make exactly {n} DDIM steps with an integer stride out of {num_steps}")
        if spec.isdigit():
            spec = int(spec)
        else:
            raise ValueError(f"unknown timestep spec {spec!r}; use an int, 'ddimN' or a list of ints")
    if isinstance(spec, int):
        n = spec
        if not 1 <= n <= num_steps:
            raise ValueError(f"cannot keep {n} steps out of {num_steps}")
        if n == 1:
            return [num_steps - 1]
        # spacing (T-1)/(n-1) >= 1, so the rounded values are distinct
        return [round(i * (num_steps - 1) / (n - 1)) for i in range(n)]
    steps = sorted(set(int(s) for s in spec))
    if not steps or steps[0] < 0 or steps[-1] >= num_steps:
        raise ValueError(f"timesteps must be a non-empty subset of 0..{num_steps - 1}, got {spec}")
    return steps
