"""The built-in VLM testbed: a LLaVA model assembled from packaged parts; registers its names with the zoo."""
