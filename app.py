"""`python app.py [flags]`: the studio, as the `pyramid-flow-studio` command runs it."""
from pyramid_app import serve

raise SystemExit(serve.main())
