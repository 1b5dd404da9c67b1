"""Visual-ignorance routing (thread 2): study driver, plots, explorer."""
