//! The fake provider runs the whole conformance suite.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use paperclip_env_core::{Error, Operation};
use paperclip_env_testkit::conformance::{self, Fixture, Outcome};
use paperclip_env_testkit::fake::FakeProvider;
use serde_json::json;

fn fixture(fake: &FakeProvider) -> Fixture {
    let (live, created, executed) = (fake.clone(), fake.clone(), fake.clone());
    let (fa, fe, fr) = (fake.clone(), fake.clone(), fake.clone());
    Fixture::new(Arc::new(fake.clone()))
        .config(json!({"image": "fake:test", "timeoutMs": 300000}))
        .live_resources(move || live.live_leases())
        .create_calls(move || created.stats().created.load(Ordering::SeqCst) as usize)
        .execute_calls(move || executed.stats().executed.load(Ordering::SeqCst) as usize)
        .fail_next_acquire(move || {
            fa.faults().fail_next(Operation::Acquire, || {
                Error::provider("fake-plugin", "injected")
            })
        })
        .fail_next_execute(move || {
            fe.faults().fail_next(Operation::Execute, || {
                Error::provider("fake-plugin", "injected")
            })
        })
        .fail_next_release(move || {
            fr.faults().fail_next(Operation::Release, || {
                Error::provider("fake-plugin", "injected")
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_provider_passes_conformance() {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder().temp_root(root.path()).build();
    let report = conformance::run(&fixture(&fake)).await;
    println!("{}", report.summary());
    report.assert_passed();
    // Every MUST line that applies to the fake ran and passed.
    let skipped = report.skipped();
    assert!(
        skipped
            .iter()
            .all(|id| ["A2.7", "A6.14", "A7.2"].contains(id)),
        "unexpected skips: {skipped:?}"
    );
    assert_eq!(
        fake.live_leases(),
        0,
        "the suite leaked leases: {:?}",
        fake.lease_ids()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_fake_reports_unknown_leases_as_not_found() {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .temp_root(root.path())
        .strict_leases(true)
        .build();
    let report = conformance::run(&fixture(&fake)).await;
    report.assert_passed();
    let a613 = report.lines.iter().find(|l| l.id == "A6.13").unwrap();
    assert_eq!(a613.outcome, Outcome::Passed);
}

#[tokio::test]
async fn secret_fields_stay_out_of_metadata() {
    let root = tempfile::tempdir().unwrap();
    let fake = FakeProvider::builder()
        .temp_root(root.path())
        .secret_field("apiKey")
        .build();
    let report = conformance::run(
        &fixture(&fake)
            .config(json!({"image": "fake:test", "apiKey": "sk-conformance-secret"}))
            .secret_value("sk-conformance-secret"),
    )
    .await;
    report.assert_passed();
    assert!(report.passed().contains(&"A2.7"));
}
