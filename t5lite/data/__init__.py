"""t5lite data layer: sources, the Task/Mixture registry, preprocessors/objectives, feature
converters with packing, grain pipelines, the embedded offline corpus and vocabularies; the
built-in tasks are registered by importing t5lite.data.catalog. See docs/data.md."""
