"""t5lite data layer: embedded corpus, vocabulary, preprocessors, feature converter, grain pipeline."""
