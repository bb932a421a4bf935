"""The people-facing side of Pyramid Flow Studio: command line, user settings, media files.

Submodules are imported directly (`pyramid_app.cli`, `pyramid_app.video`, `pyramid_app.settings`),
so reading a video does not load torch or the model.
"""
