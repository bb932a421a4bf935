from pyramid_app import serve, studio

flags = serve.parse_flags()
serve.launch(studio.build_studio(default_model=flags.model, output_dir=flags.output_dir), flags)
