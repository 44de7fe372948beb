"""What the test suites share, importable as ``support.<module>`` (pytest.ini's pythonpath).

- ``support.net``: ``free_port()``
- ``support.server``: ``Server`` (a real greeter-server subprocess), ``clean_env``, ``run_client``
- ``support.ansible``: ``recap()`` (PLAY RECAP counters), ``with_ssh_options()``
- ``support.lab``: ``prefixed()``, ``LabSession``/``LabHost`` and starting or attaching to labs
- ``support.aws_calls``: ``AwsCallRecorder`` (which AWS calls a command made, per access key
  id), ``policy_allows``, ``unused_actions``, ``check_policy`` (iam/*.json against them)
"""
