"""`python app.py [flags]`: the studio, as the `pyramid-flow-studio` command runs it."""
from pyramid_app.studio import serve

raise SystemExit(serve.main())
