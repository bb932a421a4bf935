"""`python -m pyramid_app ...` runs the command line."""
from pyramid_app.cli import main

raise SystemExit(main())
