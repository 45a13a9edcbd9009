"""laren: large-factor GAN-prior super-resolution (LAREN), with distributed training and job orchestration."""

__version__ = "0.1.0"
