"""Calibration on the train split: token windows, the linear layers' input Hessians and GPTQ's held-out gains."""
