"""lazymount's tests.  A package so that bench/ and demo.py import its harness by name (tests.registry,
tests.reference, tests.users, tests.test_snapshotter); the image builders they share are in the top-level
imagebuild.py.
"""
