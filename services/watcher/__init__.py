"""The watcher: the only reader of the Kubernetes API; turns what runs into image and scan events.

Pure decisions live in kubeobjects (decoding), digests, podstate, owners, annotations and jobstatus; the async
shell (reflector, publishing) only does I/O around them.
"""
