"""Matryoshka (bit-nested) quantisation of expert weights and its kernels."""
