# Set by the command line (laren.cli.main): S3 requests use a quick retry budget until an endpoint has answered once
# (laren/data/storage.py, QUICK). Here, not in storage.py, so that setting it imports nothing heavy.
S3_FAIL_FAST = False
