from pyramid_app import ranks, serve, studio

flags = serve.parse_flags()
serve.use_own_cache()
if ranks.launched_with_several_ranks():  # torchrun: rank 0 serves, every rank computes
    from pyramid_app.studio_ranks import serve_on_every_rank

    serve_on_every_rank(flags, studio.build_studio, serve.launch)
else:
    serve.launch(studio.build_studio(output_dir=flags.output_dir, models=flags.model, hosted=flags.hosted), flags)
