"""Constitutional AI (Bai et al. 2022): a written constitution, the model's own critiques and revisions for a
supervised stage, AI preference labels for the RL stage. Trains through the jobs of `hhh.jobs`."""
