"""GPU and host memory: estimating what a training setting needs, and the settings that make training and
sampling fit."""
