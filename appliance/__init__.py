"""The appliance: service, slide pipeline, results. Never imports torch or TensorFlow."""
