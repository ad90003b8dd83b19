"""tf_mtssl: Multi-task Self-Supervised Visual Learning (Doersch & Zisserman, ICCV 2017) in TF2/Keras 3."""

__version__ = "0.1.0"
