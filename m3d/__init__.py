"""m3d: AI-manipulated 3D CT scans, the M3Dsynth dataset builder and forensic benchmark."""
