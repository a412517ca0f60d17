"""t5lite data layer: sources, Task/Mixture registry, preprocessors/objectives, feature
converters with packing, grain pipelines, the embedded offline corpus and vocabulary.
See docs/data.md."""
