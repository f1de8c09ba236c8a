"""Shared code of the animal face recognition scripts (training, testing, Grad-CAM, SSIM)."""
