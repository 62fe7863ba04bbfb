"""l2o-kd: learning the optimizer of knowledge distillation."""
__version__ = "0.1.0"
