"""Run moto's server on loopback as the lab's AWS API, with Canonical's Ubuntu image parameters.

    .venv/bin/python lab/emulator.py --port PORT [--ready-file FILE]

Everything in the project reaches it only through the standard ``AWS_ENDPOINT_URL`` variable with
dummy credentials, so production files never name an endpoint.

Why a wrapper and not ``moto_server``: stack.yaml takes its image id from an
``AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>`` parameter whose Default is Canonical's public
SSM parameter. moto ships no ``/aws/service/canonical/...`` parameters, refuses ``put_parameter``
on ``/aws/...`` names, and resolves the Default even when a value is passed, so every stack create
fails until the parameter exists. Running the server in this process lets us add the parameters
straight to moto's SSM backend. ``POST /moto-api/reset`` wipes them: restart instead of resetting.
In the same process, moto is taught what stack.yaml needs and it lacks: the
AWS::LanguageExtensions transform (Fn::ForEach), expanded for the stack's parameter values on
create and update (expand_language_extensions, with lab/stack_template.py); a stack update
that tags the instances it adds and follows Conditions (follow_conditions_on_update), so raising
the instance count adds hosts as it does on AWS; an instance launched in its network
interface's subnet (place_instances_by_their_network_interface); and SSM's parameter writes made
atomic as on AWS (serialise_parameter_writes: the deploy lock relies on it).

``--port 0`` picks a free port; the ready file and the ready line carry the endpoint URL.

moto's request recorder (``POST /moto-api/recorder/start-recording``, ``stop-recording``,
``reset-recording``, ``GET /moto-api/recorder/download-recording``: tests/support/aws_calls.py)
is off until started, and writes to a file of this process's own, removed at exit: moto's
default is ``moto_recording`` in the current directory, which would land in the checkout.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

# moto reads these at request time. With them, an unknown instance type, image id or key pair
# fails the stack like real AWS does, instead of being accepted silently (the lab imports its own
# SSH key as a key pair: lab/launcher.py). A caller's own value wins.
MOTO_SETTINGS = {
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "1",
    "MOTO_ENABLE_AMI_VALIDATION": "1",
    "MOTO_ENABLE_KEYPAIR_VALIDATION": "1",
}

# Canonical's public parameters (the names real AWS serves) -> an image id that exists in moto's
# default image set in every region. moto's set has no 22.04/24.04 images; these two are the
# newest Canonical-owned (099720109477) images it carries, standing in for them.
UBUNTU_IMAGE_PARAMETERS = {
    "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id": (
        "ami-785db401"
    ),
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id": (
        "ami-1e749f67"
    ),
}

# Less than the lab waits for the ready file (labctl.services.EMULATOR_READY_SECONDS): on a busy
# machine the first answer can take long, and a slow start should not be a failed one.
READY_TIMEOUT_SECONDS = 150.0


def expand_language_extensions() -> None:
    """Make moto expand the AWS::LanguageExtensions transform (Fn::ForEach) as CloudFormation does.

    moto parses a stack's template as it is, and fails on stack.yaml's Fn::ForEach loops. Expand
    the template for the stack's parameter values (the create's, then each update's) before
    moto reads it. The stack keeps the template as it was sent, which GetTemplate returns, and
    GetTemplate with TemplateStage Processed returns the expansion, as on AWS.
    """
    import inspect  # noqa: PLC0415

    from cfnlint.decode import decode_str  # noqa: PLC0415 - late import, see main()
    from moto.cloudformation.models import Stack  # noqa: PLC0415
    from moto.cloudformation.responses import CloudFormationResponse  # noqa: PLC0415
    from moto.core.responses import ActionResult  # noqa: PLC0415
    from stack_template import declares_the_transform, expand  # noqa: PLC0415

    moto_init, moto_update, moto_parse = Stack.__init__, Stack.update, Stack._parse_template
    moto_get_template = CloudFormationResponse.get_template
    init_signature = inspect.signature(moto_init)

    def parse(self: Stack) -> None:
        moto_parse(self)
        if isinstance(self.template, str) and declares_the_transform(self.template_dict):
            # cfn-lint's decoder, not moto's: moto's leaves a short-form tag inside another
            # (!GetAtt [!Sub ...]) as a raw YAML node.
            template, errors = decode_str(self.template)
            if errors:
                raise ValueError(errors[0].message)
            self.template_dict = expand(template, self._greeter_parameters, self.region_name)

    def init(self: Stack, *args: object, **kwargs: object) -> None:
        bound = init_signature.bind(self, *args, **kwargs).arguments
        self._greeter_parameters = bound.get("parameters") or {}
        # moto sets the region after parsing the template; the expansion needs it first.
        self.region_name = bound["region_name"]
        moto_init(self, *args, **kwargs)

    def update(self: Stack, template: str, *args: object, **kwargs: object) -> None:
        parameters = kwargs.get("parameters", args[1] if len(args) > 1 else None)
        self._greeter_parameters = parameters or self.parameters
        moto_update(self, template, *args, **kwargs)

    def get_template(self: CloudFormationResponse) -> ActionResult:
        if self._get_param("TemplateStage") != "Processed":
            return moto_get_template(self)
        stack = self.cloudformation_backend.get_stack(self._get_param("StackName"))
        body = json.dumps(stack.template_dict)
        return ActionResult({"TemplateBody": body, "StagesAvailable": ["Original", "Processed"]})

    Stack._parse_template = parse
    Stack.__init__ = init
    Stack.update = update
    CloudFormationResponse.get_template = get_template


def follow_conditions_on_update() -> None:
    """Make moto's stack update tag the resources it adds and follow their Conditions.

    moto's update creates a resource new to the template (an instance a longer InstanceNumbers
    adds) without the stack's tags (aws:cloudformation:stack-name, which the inventory filters
    on), and compares resource definitions only, so turning the balancer on creates nothing and
    off deletes nothing, where CloudFormation does both. After moto's own update, create each
    resource whose condition now holds and that does not exist, tag each that did not exist
    before (as moto tags what a create makes), and delete each whose condition no longer holds.
    """
    from moto.cloudformation.parsing import ResourceMap  # noqa: PLC0415 - late import, see main()
    from moto.ec2 import models as ec2_models  # noqa: PLC0415
    from moto.ec2.models.core import TaggedEC2Resource  # noqa: PLC0415

    moto_update = ResourceMap.update

    def update(self: ResourceMap, template: dict, parameters: dict | None = None) -> None:
        dropped = set(self._resource_json_map) - set(template["Resources"])
        existed = {name for name, made in self._parsed_resources.items() if made is not None}
        moto_update(self, template, parameters)
        # moto deletes a resource the template drops but keeps it parsed, and would hand the
        # deleted one back if a later update brought the name back (an instance count raised
        # again): forget it.
        for name in dropped:
            self._parsed_resources.pop(name, None)
        for name, resource in template["Resources"].items():
            condition = resource.get("Condition")
            wanted = not condition or bool(self.lazy_condition_map[condition])
            made = self._parsed_resources.get(name) is not None
            if wanted and name not in existed:
                instance = self[name]  # creates it unless moto's update did
                if isinstance(instance, TaggedEC2Resource):
                    tags = dict(self.tags, **{"aws:cloudformation:logical-id": name})
                    backend = ec2_models.ec2_backends[self._account_id][self._region_name]
                    backend.create_tags([instance.physical_resource_id], tags)
            elif made and not wanted:
                self._delete_resource(self._parsed_resources.pop(name), resource)

    ResourceMap.update = update


def place_instances_by_their_network_interface() -> None:
    """Make moto's CloudFormation instances follow their primary network interface's subnet.

    moto's AWS::EC2::Instance reads SubnetId only, so an instance whose primary interface names
    the subnet (stack.yaml with PrivateSubnet "true": no public address, whatever the subnet)
    would land in the default VPC with a public address. Launch it in that subnet instead: moto
    gives a stack's instance in a subnet no public address, which is what
    AssociatePublicIpAddress false asks. An interface asking for a public address is refused
    rather than emulated wrongly.
    """
    from moto.ec2.models.instances import Instance  # noqa: PLC0415 - late import, see main()

    moto_create = Instance.create_from_cloudformation_json.__func__

    def create(cls: type, name: str, cloudformation_json: dict, *args: object, **kwargs: object):
        properties = cloudformation_json["Properties"]
        interfaces = properties.get("NetworkInterfaces") or []
        primary = next((i for i in interfaces if str(i.get("DeviceIndex")) == "0"), None)
        if primary is not None:
            if primary.get("AssociatePublicIpAddress") not in (False, "false"):
                raise NotImplementedError("emulator: only AssociatePublicIpAddress false")
            properties = {**properties, "SubnetId": primary["SubnetId"]}
            cloudformation_json = {**cloudformation_json, "Properties": properties}
        return moto_create(cls, name, cloudformation_json, *args, **kwargs)

    Instance.create_from_cloudformation_json = classmethod(create)


def serialise_parameter_writes() -> None:
    """Make moto's SSM PutParameter and DeleteParameter atomic, as SSM's are.

    The fleet's deploy lock (roles/greeter/library/greeter_lock.py) is a parameter created with
    Overwrite=False: of two racing creates AWS accepts one and refuses the other with
    ParameterAlreadyExists. moto checks for an existing parameter and stores the new one later in
    the same method, unlocked, while its server answers requests on threads: two creates racing
    on the server could both pass the check. One lock around the writes makes the emulator decide
    as AWS does (tests/aws/test_lock.py races up to four creates at a time).
    """
    from moto.ssm.models import SimpleSystemManagerBackend  # noqa: PLC0415 - late, see main()

    writes = threading.Lock()
    for method in ("put_parameter", "delete_parameter"):
        moto_method = getattr(SimpleSystemManagerBackend, method)

        def locked(self: object, *args: object, _moto=moto_method, **kwargs: object) -> object:
            with writes:
                return _moto(self, *args, **kwargs)

        setattr(SimpleSystemManagerBackend, method, locked)


def loopback_host(value: str) -> str:
    """Accept only a loopback address: the emulator must never be reachable from elsewhere."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None
    if not address.is_loopback:
        raise argparse.ArgumentTypeError(f"{value} is not a loopback address; refusing to bind it")
    return value


def port_number(value: str) -> int:
    """A TCP port, or 0 for "pick a free one"."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0..65535")
    return port


def seed_image_parameters() -> None:
    """Add Canonical's image parameters to moto's SSM store in every region moto knows."""
    from moto.core import DEFAULT_ACCOUNT_ID  # noqa: PLC0415 - late import, see main()
    from moto.ssm.models import Parameter, ssm_backends  # noqa: PLC0415

    backends = ssm_backends[DEFAULT_ACCOUNT_ID]
    now = datetime.now(timezone.utc)
    for region in backends.regions:
        store = backends[region]._parameters
        for name, image_id in UBUNTU_IMAGE_PARAMETERS.items():
            store[name] = [
                Parameter(
                    account_id=DEFAULT_ACCOUNT_ID,
                    name=name,
                    value=image_id,
                    parameter_type="String",
                    description=None,
                    allowed_pattern=None,
                    keyid=None,
                    last_modified_date=now,
                    version=1,
                    data_type="aws:ec2:image",
                )
            ]


def wait_until_answering(endpoint: str, region: str) -> None:
    """Ask the server over HTTP for a seeded parameter, as every client will, until it answers."""
    import boto3  # noqa: PLC0415 - imported late: only needed once, after the server starts
    from botocore.config import Config  # noqa: PLC0415

    ssm = boto3.client(
        "ssm",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )
    name = next(iter(UBUNTU_IMAGE_PARAMETERS))
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        try:
            ssm.get_parameter(Name=name)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def write_atomically(path: Path, text: str) -> None:
    """Readers poll for the file, so it must appear complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=port_number, required=True, help="TCP port (0: pick one)")
    parser.add_argument(
        "--host", type=loopback_host, default="127.0.0.1", help="loopback address to bind"
    )
    parser.add_argument(
        "--ready-file", type=Path, help="written with the endpoint URL once the server answers"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    # One line per request drowns the lab's log; errors still show.
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.WARNING)

    # moto takes seconds to import: refuse bad arguments before paying for it.
    for name, value in MOTO_SETTINGS.items():
        os.environ.setdefault(name, value)
    # Read when moto is imported. Created empty, so a download before any recording is empty.
    recording_dir = Path(tempfile.mkdtemp(prefix="greeter-emulator-"))
    recording = recording_dir / "recording.jsonl"
    recording.touch()
    os.environ.setdefault("MOTO_RECORDER_FILEPATH", str(recording))
    try:
        return serve(args)
    finally:
        shutil.rmtree(recording_dir, ignore_errors=True)


def serve(args: argparse.Namespace) -> int:
    """Start the server on the parsed arguments and run until SIGTERM or SIGINT."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    seed_image_parameters()
    expand_language_extensions()
    follow_conditions_on_update()
    place_instances_by_their_network_interface()
    serialise_parameter_writes()
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    try:
        server.start()
    except OSError as error:
        print(f"emulator: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    host, port = server.get_host_and_port()
    url_host = f"[{host}]" if ":" in host else host
    endpoint = f"http://{url_host}:{port}"
    try:
        wait_until_answering(endpoint, os.environ.get("AWS_REGION", "us-east-1"))
        if args.ready_file:
            write_atomically(args.ready_file, endpoint + "\n")
        print(f"emulator ready: {endpoint} (pid {os.getpid()})", flush=True)
        stop.wait()
    finally:
        server.stop()
        if args.ready_file:
            args.ready_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
