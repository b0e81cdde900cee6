"""Operations helpers shared by every stage: atomic checkpoints and resume, learning-rate scaling, run ids,
git info, multirun task wrapping, FSDP policies. No stage maths here."""
