"""Sirocco's builtin inference runtime: an OpenAI-compatible server for Mixtral-format MoE models.

It is the program of the runtime pod image and imports nothing from the control plane.
"""
