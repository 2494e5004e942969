"""Serving stage: the web app and REST API (`histoscreen serve`), a thin layer over the tasks."""
