"""Inference on a bundle's networks. Imports nothing from appliance, export or gui."""
