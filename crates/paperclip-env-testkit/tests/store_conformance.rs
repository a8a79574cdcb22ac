//! The in-memory lease store passes the store conformance suite.

use paperclip_env_core::store::InMemoryLeaseStore;
use paperclip_env_testkit::store_conformance::{StoreFixture, run};

#[tokio::test]
async fn in_memory_store_conforms() {
    let store = InMemoryLeaseStore::new();
    let report = run(&StoreFixture::new(&store).exclusive_claims(true)).await;
    report.assert_passed();
    assert_eq!(report.passed.len(), 14);
}
