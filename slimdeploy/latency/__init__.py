"""Latency: runners (backends), the one timing protocol (timing), hardware fingerprints, the pieces a profile
times (components), profiling (profile) and its calibration, whole-model measurement (measure), and the model
that predicts a structure's latency from a profile (model)."""
