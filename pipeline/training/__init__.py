"""The fine-tuning job's settings, loop, augmentation and data import (Ray-free)."""
