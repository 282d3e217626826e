"""Code shared by the jobs and the server: config, data, chat templates, model loading."""
