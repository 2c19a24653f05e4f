"""The linear-algebra core: operators, linear prefixes, harmless subspaces.

Knows nothing of images, datasets or files.
"""
