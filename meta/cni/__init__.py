"""The CNI protocol: requests, results, errors and version conversion.

Everything in this package is standard library only, so that the executable a runtime runs
stays cheap to start.
"""
