"""Settings come from the environment and fail with the variable's name."""

from __future__ import annotations

import pytest

from flashsale.settings import SettingError, Settings
from flashsale.topics import DECISIONS, SKU_COMMANDS, catalogue


def test_defaults_are_local_and_non_default_ports():
    s = Settings.from_env({})
    assert s.infra_mode == "local"
    assert s.kafka_bootstrap == "127.0.0.1:19092"
    assert ":15432/" in s.database_url


def test_external_servers_switch_mode_and_forbid_destruction():
    s = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "DATABASE_URL": "postgresql://x"})
    assert s.infra_mode == "external" and not s.destructive_tests_allowed


def test_a_three_node_cluster_replicates_every_topic_three_times():
    s = Settings.from_env({"FLASHSALE_CLUSTER": "3", "FLASHSALE_KAFKA_PORT": "20000"})
    assert s.kafka_bootstrap == "127.0.0.1:20000,127.0.0.1:20002,127.0.0.1:20004"
    topics = catalogue(s)
    assert {(t.replication_factor, t.min_insync_replicas) for t in topics} == {(3, 2)}
    assert all(t.config()["unclean.leader.election.enable"] == "false" for t in topics)
    assert s.kafka_auth == "scram" and Settings.from_env({}).kafka_auth == "none"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"FLASHSALE_KAFKA_PORT": "abc"}, "FLASHSALE_KAFKA_PORT"),
        ({"FLASHSALE_PG_PORT": "80"}, "FLASHSALE_PG_PORT"),
        ({"FLASHSALE_INFRA": "cloud"}, "FLASHSALE_INFRA"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "k:1"}, "DATABASE_URL"),
        ({"FLASHSALE_CLUSTER": "6"}, "FLASHSALE_CLUSTER"),
        ({"FLASHSALE_KAFKA_AUTH": "tls"}, "FLASHSALE_KAFKA_AUTH"),
    ],
)
def test_invalid_setting_is_named(env, name):
    with pytest.raises(SettingError, match=name):
        Settings.from_env(env)


def test_catalogue_shapes_the_log():
    topics = {t.name: t for t in catalogue(Settings.from_env({}))}
    assert topics[SKU_COMMANDS].timestamp_type == "LogAppendTime"
    assert topics[SKU_COMMANDS].partitions == topics[DECISIONS].partitions
    assert topics[SKU_COMMANDS].retention_ms == -1 and topics[DECISIONS].retention_ms == -1
    assert "PurchaseIntent" in topics[SKU_COMMANDS].value_schemas
    assert "OpenSale" in topics[SKU_COMMANDS].value_schemas
