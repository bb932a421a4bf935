"""The people-facing side of Pyramid Flow Studio: command line, user settings, the studio.

Submodules are imported directly (`pyramid_app.cli`, `pyramid_app.options.settings`); media files are read
and written by `model_core.media_files`, which loads neither torch nor the model.
"""
