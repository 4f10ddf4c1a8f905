"""images.builder: the shell scripts the image builder VM runs (its /init and the second stage in
the new root's chroot), package data read by vm/image_build.py (docs/ARCHITECTURE.md).
"""
