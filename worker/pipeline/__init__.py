"""The slide pipeline: slide -> ROI plan -> reads -> detection -> classification -> results.

Plain Python: no Celery and no database imports, so every stage is testable directly.
"""
