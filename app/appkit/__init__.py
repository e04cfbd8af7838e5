"""Streamlit plumbing shared by the pages: cached resources, roles, the clickable image.

Only glue lives here: every decision about data (which image, what is stored, how consensus
or reliability is computed) is made by the ``cellspot`` workflow functions the pages call.
"""
