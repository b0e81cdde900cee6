"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a model function."""
import torch


def _merge(key, c, u):
    if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
        if c.shape[1:] != u.shape[1:] or c.shape[0] != u.shape[0]:
            raise ValueError(f"guidance kwarg {key!r}: cond shape {tuple(c.shape)} != uncond shape {tuple(u.shape)}")
        return torch.cat([c, u], dim=0)
    if isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor):
        raise ValueError(f"guidance kwarg {key!r} must be a tensor in both branches or in neither")
    if c != u:
        raise ValueError(f"non-tensor guidance kwarg {key!r} differs between branches ({c!r} vs {u!r})")
    return c


def classifier_free_guidance(model_fn, scale: float, cond_kwargs: dict, uncond_kwargs: dict,
                             split_channels: int | None = None):
    """Wrap model_fn so that it returns uncond + scale * (cond - uncond).

    The conditional and unconditional branches run in ONE forward pass: x (B, ...), t (B,) and every tensor
    kwarg are concatenated [cond; uncond] along dim 0 (non-tensor kwargs must be equal in both branches). The
    branch kwargs are concatenated once, here, not at every step (a prior's K/V cache is large). Keyword arguments
    given to the returned function at call time (e.g. a sampler's model_kwargs) are shared by both branches; the
    branch kwargs win on a name clash. scale == 1 runs only the conditional branch.

    Args:
        model_fn: model_fn(x, t, **kwargs) -> (B, C', ...).
        scale: guidance scale w (1 = conditional, 0 = unconditional).
        cond_kwargs / uncond_kwargs: conditioning of each branch, with the same keys.
        split_channels: for learn_sigma outputs, the number of target channels C on dim 1: only out[:, :C] is
            guided, the variance channels out[:, C:] are taken from the conditional branch.
    Returns:
        guided_fn(x, t, **kwargs) -> (B, C', ...).
    """
    if set(cond_kwargs) != set(uncond_kwargs):
        raise ValueError(f"cond and uncond kwargs need the same keys: {sorted(cond_kwargs)} vs {sorted(uncond_kwargs)}")

    both = {k: _merge(k, cond_kwargs[k], uncond_kwargs[k]) for k in cond_kwargs} if scale != 1 else {}

    def guided_fn(x, t, **kwargs):
        if scale == 1:
            return model_fn(x, t, **{**kwargs, **cond_kwargs})
        shared = {k: _merge(k, v, v) for k, v in kwargs.items() if k not in both}
        out = model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **shared, **both)
        out_c, out_u = out.chunk(2, dim=0)
        guided = out_u + scale * (out_c - out_u)
        if split_channels is not None:
            guided = torch.cat([guided[:, :split_channels], out_c[:, split_channels:]], dim=1)
        return guided

    return guided_fn
