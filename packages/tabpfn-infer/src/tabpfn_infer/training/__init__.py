"""Training: the synthetic prior (`prior`), ARTabPFN training (`train`), and the transformer
neural process with its trainer (`tnp`, `train_tnp`)."""
