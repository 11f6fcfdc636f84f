"""A coordinator that deviates from the secure-aggregation protocol, against real enrolled sites
(issue 14, items 1-4, and SecAgg's consistency check).

Every attack runs the real site code (the ClientApp's secure-aggregation handler and its masking,
each site with its own ledger key, enrolled in one run with a signed roster) under the real
coordinator code, which the attacker then bends: it rewrites, withholds, repeats or invents the
requests it sends. Where the goal is a single site's update, the test does not stop at the site's
refusal: it plays the recovery with everything the coordinator collected and checks what it gets.
The attacker holds none of the sites' ledger keys.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from client.site import resolve_site
from pm_common.secagg import primitives as sa
from pm_common.study.config import study_text_for_sites
from pm_common.wire import keys as p
from tests.conftest import train_message
from tests.test_secure_aggregation import Federation, Grid, answer, updates_of

WEIGHTS = [30, 50, 10, 80, 40]


def _collected(grid: Grid) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """Every self-mask seed share and mask-key share the sites handed the coordinator, by owner."""
    seeds: dict[str, list[bytes]] = {}
    keys: dict[str, list[bytes]] = {}
    for reply in grid.replies:
        if reply.has_error():
            continue
        record = reply.content[p.SECAGG]
        for site, share in zip(record.get("seed-sites", []), record.get("seed-shares", []), strict=True):
            seeds.setdefault(str(site), []).append(bytes(share))
        for site, share in zip(record.get("key-sites", []), record.get("key-shares", []), strict=True):
            keys.setdefault(str(site), []).append(bytes(share))
    return seeds, keys


def unmask_alone(
    federation: Federation, server_round: int, victim: int, partners: list[str]
) -> np.ndarray | None:
    """What the coordinator can compute of one site's input from all it collected: the site's
    [w * update, w] if it holds the site's masked input, its self-mask seed and the mask keys of
    every `partners` (the neighbours whose bundles it relayed to the site); None otherwise."""
    masked = federation.masked.get(server_round, {}).get(victim)
    current = federation.secure._round
    if masked is None or current is None:
        return None
    seeds, keys = _collected(federation.grid)
    name, t = federation.grid.names[victim], current.threshold
    if len(seeds.get(name, [])) < t or any(len(keys.get(peer, [])) < t for peer in partners):
        return None
    length = len(masked)
    own = masked - sa.self_mask(sa.combine_shares(seeds[name][:t]), server_round, length)
    for peer in partners:
        pair = sa.pairwise_mask(sa.combine_shares(keys[peer][:t]), current.pk_s[name], server_round, length)
        own = own - pair if sa.pairwise_sign(name, peer) > 0 else own + pair
    return federation.secure.rules.quantiser.dequantise_sum(own, 1)


def _input_of(federation: Federation, updates: list[np.ndarray], node: int) -> np.ndarray:
    ratio = WEIGHTS[node - 1] / federation.config.max_weight
    return np.append(updates[node - 1] * ratio, ratio)


def _refusals(grid: Grid, stage: str, server_round: int) -> dict[int, str]:
    """The sites' refusals of one stage of a round, by node."""
    return {
        msg.metadata.dst_node_id: reply.error.reason
        for msg, reply in zip(grid.log, grid.replies, strict=True)
        if msg.content[p.SECAGG]["stage"] == stage and int(msg.content[p.SECAGG]["round"]) == server_round
        and reply.has_error()
    }


# -- item 1: share bundles withheld ---------------------------------------------------------------


def test_a_site_given_no_share_bundles_sends_no_input(tmp_path: Path) -> None:
    """Claim: a coordinator that relays no share bundles to a site cannot recover that site's update
    from the other sites' shares: a site holding bundles from fewer than the threshold of its
    neighbours (its own included) sends no input (SecAgg+'s abort rule); the others' round goes on.
    Attack: the coordinator keys a round honestly, relays no bundles to site-3 (which would then mask
    with its self mask alone), runs the round as usual (the other sites hand over the self-mask seed
    shares of every input that arrived) and unmasks site-3's input from all it collected."""
    federation = Federation(tmp_path, 5)
    updates = updates_of(5)

    def starve(node: int, relay: ConfigRecord) -> None:
        if node == 3:
            relay["senders"], relay["sealed"] = [], []

    aggregate = federation.round(1, updates, WEIGHTS, relay=starve)
    stolen = unmask_alone(federation, 1, victim=3, partners=[])
    assert stolen is None or not np.allclose(stolen, _input_of(federation, updates, 3), atol=1e-4)
    assert "fewer than the threshold 3; this site sends no input" in federation.refusals[1][3]
    assert aggregate is not None  # the four others' sum, unmasked as always


def test_sites_shown_different_survivor_sets_reveal_nothing(tmp_path: Path) -> None:
    """Claim: a coordinator cannot unmask one site by telling different sites different stories
    about who dropped out: a site reveals shares only for the survivor set it confirmed, once a
    majority of the roster confirmed the very same set (SecAgg's consistency check), and never both
    kinds of share for one peer across the requests of a round.
    Attack: site-3 gets bundles from just the threshold's worth of neighbours (site-1, site-2, so it
    does not abort); the coordinator then tells site-3 that those two survived, site-4 and site-5
    that they dropped, site-1 that site-2 dropped and site-2 that site-1 did (without the check,
    site-3's seed and both partners' mask keys then each reach the threshold), collects everything,
    asks every site again with the other story, and unmasks site-3."""
    federation = Federation(tmp_path, 5)
    grid, updates = federation.grid, updates_of(5, seed=3)
    partners = ["site-1", "site-2"]

    def few(node: int, relay: ConfigRecord) -> None:
        if node == 3:
            kept = [(s, b) for s, b in zip(relay["senders"], relay["sealed"], strict=True) if s in partners]
            relay["senders"], relay["sealed"] = [s for s, _ in kept], [b for _, b in kept]

    federation.train(1, updates, WEIGHTS, relay=few)
    assert 3 in federation.masked[1]  # site-3 masked with its two partners only
    partners_survive, partners_gone = ["site-1", "site-2", "site-3"], ["site-3", "site-4", "site-5"]
    views = {1: ["site-1", "site-3", "site-4"], 2: ["site-2", "site-3", "site-4"],
             3: partners_survive, 4: partners_gone, 5: partners_gone}
    signed = {node: grid.ask(node, "survivors", 1, survivors=view) for node, view in views.items()}
    assert all(isinstance(s, ConfigRecord) for s in signed.values())  # each view alone is plausible
    signatures = {grid.names[n]: bytes(s["signature"]) for n, s in signed.items()}  # type: ignore[index]
    other_story = {1: partners_survive, 2: partners_survive, 3: partners_gone, 4: views[1], 5: views[1]}
    answers = {
        story: [grid.ask(node, stage, 1, survivors=view, signers=list(signatures),
                         **{"survivor-signatures": list(signatures.values())})
                for node, view in told.items() for stage in ("unmask", "survivors")]
        for story, told in (("first", views), ("second", other_story))
    }
    assert unmask_alone(federation, 1, victim=3, partners=partners) is None
    assert _collected(grid) == ({}, {})
    first_unmask = answers["first"][::2]
    assert all("fewer than a majority of the roster" in str(a) for a in first_unmask)
    assert all("not the survivor set this site confirmed" in str(a) for a in answers["second"][::2])
    assert all("already confirmed another survivor set" in str(a) for a in answers["second"][1::2])


# -- item 2: repeated key stages ------------------------------------------------------------------


def test_a_repeated_share_keys_request_gets_no_second_set_of_shares(tmp_path: Path) -> None:
    """Claim: a site deals its shares once per round and seals every bundle under a fresh nonce: a
    coordinator that asks again gets no second share set (sealed, as before, under the same key
    and the fixed zero nonce, two sets XORed to the XOR of their shares), and a repeated set-up
    gets the same keys back, never a second key set.
    Attack: after an honest key round the coordinator sends site-1 its share-keys request again,
    as it was and with the neighbours reordered, and its set-up request again."""
    federation = Federation(tmp_path, 4)
    grid = federation.grid
    federation.train(1, updates_of(4), WEIGHTS[:4])
    sent = {str(m.content[p.SECAGG]["stage"]): (i, m.content[p.SECAGG]) for i, m in enumerate(grid.log)
            if m.metadata.dst_node_id == 1}
    index, request = sent["share-keys"]
    body = {k: v for k, v in request.items() if k not in ("study", "run", "stage", "round")}
    again = grid.ask(1, "share-keys", 1, **body)
    reordered = {k: list(reversed(v)) if isinstance(v, list) else v for k, v in body.items()}
    again_reordered = grid.ask(1, "share-keys", 1, **reordered)
    for refusal in (again, again_reordered):
        assert isinstance(refusal, str) and "already shared its keys" in refusal
    nonces = [bytes(b)[: sa.NONCE_BYTES] for b in grid.replies[index].content[p.SECAGG]["sealed"]]
    assert len(set(nonces)) == len(nonces) and bytes(sa.NONCE_BYTES) not in nonces
    setup_index, setup = sent["setup"]
    repeated = grid.ask(1, "setup", 1, **{"study-toml": setup["study-toml"]})
    first = grid.replies[setup_index].content[p.SECAGG]
    assert isinstance(repeated, ConfigRecord)
    assert (repeated["pk-c"], repeated["pk-s"]) == (first["pk-c"], first["pk-s"])


# -- item 3: substituted public keys --------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "refusal"),
    [
        ("its own keys", "not signed by those sites' enrolled keys"),
        ("its own keys, signed by a key of its own", "not signed by those sites' enrolled keys"),
        ("another site's keys under the name listed twice", "listed twice"),
        ("its own keys under a name not on the roster", "not on the run's roster"),
    ],
)
def test_substituted_public_keys_are_refused(tmp_path: Path, how: str, refusal: str) -> None:
    """Claim: a coordinator cannot put keys of its own in a site's place: every site signs its round
    public keys with its ledger key (bound to run, round and name), and its peers refuse keys whose
    signature does not verify against the roster, a neighbour listed twice, or one not on the roster;
    no peer then deals a share bundle the coordinator could open.
    Attack: in the share-keys requests to every other site, the coordinator replaces site-2's keys by
    X25519 keys whose secrets it holds (keeping site-2's signature, or signing with an Ed25519 key of
    its own), or lists site-3 twice, or lists a site 'mallory' the roster does not name."""
    federation = Federation(tmp_path, 4)
    grid, run = federation.grid, federation.grid.roster.run
    sk_c, mask_seed = sa.new_private_key(), bytes(16)
    attacker_keys = [sa.public_key(sk_c), sa.public_key(sa.mask_private_key(mask_seed))]
    forger = Ed25519PrivateKey.generate()

    def substitute(node: int, request: ConfigRecord) -> ConfigRecord | None:
        if request["stage"] != "share-keys" or node == 2:
            return None
        fields = {k: list(request[k]) for k in ("neighbours", "pk-c", "pk-s", "key-signatures")}
        at = fields["neighbours"].index("site-2")
        if how.startswith("another site's"):
            donor = fields["neighbours"].index("site-3")
            for key in fields:
                fields[key][at] = fields[key][donor]
        else:
            fields["pk-c"][at], fields["pk-s"][at] = attacker_keys
            if "a name not on the roster" in how:
                fields["neighbours"][at] = "mallory"
            if "signed by a key of its own" in how:
                fields["key-signatures"][at] = sa.sign_keys(forger, run, 1, "site-2", *attacker_keys)
        return ConfigRecord({**request, **fields})

    grid.tamper = substitute
    federation.train(1, updates_of(4), WEIGHTS[:4])
    refused = _refusals(grid, "share-keys", 1)
    assert sorted(refused) == [1, 3, 4] and all(refusal in reason for reason in refused.values())
    assert not _bundles_for(grid, "site-2", sk_c, run)
    assert any("only 1 sites shared keys" in f for f in federation.recorder.failures[1])


def test_substituted_keys_for_the_next_round_are_refused(tmp_path: Path) -> None:
    """Claim: the round keys a site sends in advance, with its training reply, are signed and
    checked like any others: a coordinator cannot substitute them in the pipelined key sharing.
    Attack: after an honest round 1, in the round-2 key sharing carried by round 1's confirmation
    requests, the coordinator replaces site-2's round-2 keys with its own."""
    federation = Federation(tmp_path, 4, rounds=2)
    grid = federation.grid
    sk_c = sa.new_private_key()
    attacker_keys = [sa.public_key(sk_c), sa.public_key(sa.mask_private_key(bytes(16)))]

    def substitute(node: int, request: ConfigRecord) -> ConfigRecord | None:
        if "next-round" not in request or node == 2:
            return None
        pk_c, pk_s = list(request["pk-c"]), list(request["pk-s"])
        at = list(request["neighbours"]).index("site-2")
        pk_c[at], pk_s[at] = attacker_keys
        return ConfigRecord({**request, "pk-c": pk_c, "pk-s": pk_s})

    grid.tamper = substitute
    federation.round(1, updates_of(4), WEIGHTS[:4])
    refused = _refusals(grid, "survivors", 1)
    assert sorted(refused) == [1, 3, 4]
    assert all("not signed by those sites' enrolled keys" in reason for reason in refused.values())
    assert not _bundles_for(grid, "site-2", sk_c, grid.roster.run, server_round=2)


def _bundles_for(grid: Grid, victim: str, sk_c: bytes, run: str, server_round: int = 1) -> list[bytes]:
    """The shares of other sites the coordinator opens with its substituted key: every bundle a
    site dealt to `victim` in `server_round` that opens under the attacker's secret."""
    opened = []
    for msg, reply in zip(grid.log, grid.replies, strict=True):
        request = msg.content[p.SECAGG]
        if reply.has_error() or "destinations" not in reply.content[p.SECAGG]:
            continue
        if int(request.get("next-round", request["round"])) != server_round:
            continue
        record, sender = reply.content[p.SECAGG], grid.names[msg.metadata.dst_node_id]
        pk_c = dict(zip(request["neighbours"], request["pk-c"], strict=True))[sender]
        for destination, blob in zip(record["destinations"], record["sealed"], strict=True):
            if destination == victim:
                context = sa.share_context(run, server_round, sender, victim)
                try:
                    opened.append(sa.unseal(sa.agree(sk_c, bytes(pk_c), context), bytes(blob), context))
                except sa.SecAggError:
                    continue
    return opened


# -- item 4: parameters the coordinator sends -----------------------------------------------------


@pytest.mark.parametrize(
    ("parameter", "value", "refusal"),
    [
        ("levels", 2**32 - 1, "quantisation levels are not the"),  # the sum wraps modulo 2**32
        ("levels", 2, "quantisation levels are not the"),  # one bit per coordinate
        ("clip-range", 1e6, "clip range 1000000.0 is not the study's 2.0"),
        ("max-weight", 1e-6, "max weight 1e-06 is not the study's 100.0"),  # every site weighs 1
    ],
)
def test_quantisation_and_weights_are_the_studys(
    tmp_path: Path, parameter: str, value: Any, refusal: str
) -> None:
    """Claim: a site quantises and weights its update only as the study and its roster say
    (levels = what the roster's size allows without wrapping, the study's clip range and max
    weight), and checks the relay before it trains: a refused relay costs it no privacy budget.
    Attack: the training relay to site-1 (the real ClientApp, on Cleveland's rows) carries
    quantisation levels that let the sum wrap or leave one bit per coordinate, a clip range that
    drowns the update in rounding, or a max weight that gives every site the same weight."""
    federation = Federation(tmp_path, 4)
    grid = federation.grid
    relays = {}

    def capture(node: int, relay: ConfigRecord) -> None:
        relays[node] = ConfigRecord(dict(relay))

    # keys the round; site-1 answers the real training message below, the others mask as usual
    federation.train(1, updates_of(4), WEIGHTS[:4], drop_before_input={1}, relay=capture)
    honest = train_message(grid.study, 1, run=grid.roster.run)

    def train(relay: ConfigRecord) -> Message:
        content = RecordDict({**dict(honest.content.items()), p.SECAGG: relay})
        return answer(client_app, Message(content, dst_node_id=1, message_type=honest.metadata.message_type),
                      grid.contexts[1])

    reply = train(ConfigRecord({**relays[1], parameter: value}))
    assert reply.has_error() and refusal in reply.error.reason
    _, store = resolve_site(grid.contexts[1], grid.study.name)
    state = store.load()
    assert state is not None
    assert [json.loads(line)["status"] for line in state.ledger] == ["enrolled"]  # nothing spent
    assert not state.accountant.get("history")
    reply = train(relays[1])  # the relay as the coordinator made it: the site trains and masks
    assert not reply.has_error() and p.MASKED in reply.content


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ("threshold below the study's", "is not the study's (4, threshold = 0.8)"),
        ("a neighbourhood of two", "a neighbourhood of 2 sites is outside what the study and its roster"),
    ],
)
def test_key_sharing_parameters_are_the_studys(tmp_path: Path, change: str, refusal: str) -> None:
    """Claim: a site shares its keys only with the study's threshold for its neighbourhood and a
    neighbourhood no smaller than an honest round gives it: a strict majority alone is not enough.
    Attack: in a study whose threshold is 0.8 of the share holders (4 of 5), the coordinator asks
    site-1 to share with a threshold of 3 (still a strict majority), or with just one neighbour and
    a threshold of 2 (a strict majority of two)."""
    federation = Federation(tmp_path, 5, threshold=0.8)
    grid = federation.grid

    def weaken(node: int, request: ConfigRecord) -> ConfigRecord | None:
        if request["stage"] != "share-keys" or node != 1:
            return None
        if change.startswith("threshold"):
            return ConfigRecord({**request, "threshold": 3})
        fields = ("neighbours", "pk-c", "pk-s", "key-signatures")
        return ConfigRecord({**request, "threshold": 2, **{k: list(request[k])[:2] for k in fields}})

    grid.tamper = weaken
    federation.train(1, updates_of(5), WEIGHTS)
    refused = _refusals(grid, "share-keys", 1)
    assert list(refused) == [1] and refusal in refused[1]


def test_the_study_a_site_keys_under_is_the_one_it_signed(tmp_path: Path) -> None:
    """Claim: a site takes its secure-aggregation rules only from the study text whose digest it
    signed in the run's roster, never from whatever study the coordinator sends with the set-up.
    Attack: the set-up request carries the study with a clip range of a million and a threshold
    of one half."""
    grid = Grid(tmp_path, 4)
    raw = tomllib.loads(study_text_for_sites(grid.study))
    raw["secure_aggregation"] |= {"clip_range": 1e6, "threshold": 0.5}
    refused = grid.ask(1, "setup", 1, **{"study-toml": tomli_w.dumps(raw)})
    assert isinstance(refused, str) and "not the one this site signed in the roster" in refused


def test_a_site_answers_only_runs_it_enrolled_in(tmp_path: Path) -> None:
    """Claim: a site answers secure-aggregation requests only with its enrolled identity, for a run
    it enrolled in.
    Attack: set-up requests naming no run, and naming a run the site never enrolled in."""
    grid = Grid(tmp_path, 4)
    text = study_text_for_sites(grid.study)
    for run in ("", "0" * 32):
        msg = Message(RecordDict({p.SECAGG: ConfigRecord({
            "study": grid.study.name, "run": run, "stage": "setup", "round": 1, "study-toml": text,
        })}), dst_node_id=1, message_type=p.SECAGG_MESSAGE)
        reply = grid.deliver(msg)
        assert reply.has_error() and "not enrolled in run" in reply.error.reason
