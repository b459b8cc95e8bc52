"""The paper's comparison methods (3D Pix2Pix, conditional 3D LDM)."""
