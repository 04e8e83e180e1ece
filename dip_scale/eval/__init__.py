"""Evaluation: FID of exported EMA weights (fid.py, features.py), dispatched per checkpoint (dispatch.py)."""
