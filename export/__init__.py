"""The torch / TensorFlow side: model definitions, loaders, export, parity, bundles."""
