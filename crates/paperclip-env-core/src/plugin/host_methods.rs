//! The worker→host methods Paperclip's host serves and the manifest
//! capability each needs (`null` in upstream's table: none), as listed by
//! `METHOD_CAPABILITY_MAP` in `@paperclipai/plugin-sdk` 2026.916.1
//! (`dist/host-client-factory.js`). A method in this table that the SDK host
//! does not serve is refused with the capability error (-32001), never with
//! "method not found" (-32601), which stays for names upstream does not know.

/// `(method, required capability)`, in upstream's order.
pub(crate) const UPSTREAM_HOST_METHODS: &[(&str, Option<&str>)] = &[
    ("config.get", None),
    ("localFolders.declarations", None),
    ("localFolders.configure", Some("local.folders")),
    ("localFolders.status", Some("local.folders")),
    ("localFolders.list", Some("local.folders")),
    ("localFolders.readText", Some("local.folders")),
    ("localFolders.writeTextAtomic", Some("local.folders")),
    ("localFolders.deleteFile", Some("local.folders")),
    ("state.get", Some("plugin.state.read")),
    ("state.set", Some("plugin.state.write")),
    ("state.delete", Some("plugin.state.write")),
    ("db.namespace", Some("database.namespace.read")),
    ("db.query", Some("database.namespace.read")),
    ("db.execute", Some("database.namespace.write")),
    ("entities.upsert", None),
    ("entities.list", None),
    ("events.emit", Some("events.emit")),
    ("events.subscribe", Some("events.subscribe")),
    ("http.fetch", Some("http.outbound")),
    ("secrets.resolve", Some("secrets.read-ref")),
    ("activity.log", Some("activity.log.write")),
    ("metrics.write", Some("metrics.write")),
    ("telemetry.track", Some("telemetry.track")),
    ("log", None),
    ("span.record", Some("environment.drivers.register")),
    ("companies.list", Some("companies.read")),
    ("companies.get", Some("companies.read")),
    ("projects.list", Some("projects.read")),
    ("projects.get", Some("projects.read")),
    ("projects.listWorkspaces", Some("project.workspaces.read")),
    (
        "projects.getPrimaryWorkspace",
        Some("project.workspaces.read"),
    ),
    (
        "projects.getWorkspaceForIssue",
        Some("project.workspaces.read"),
    ),
    ("executionWorkspaces.get", Some("execution.workspaces.read")),
    ("projects.managed.get", Some("projects.managed")),
    ("projects.managed.reconcile", Some("projects.managed")),
    ("projects.managed.reset", Some("projects.managed")),
    ("routines.managed.get", Some("routines.managed")),
    ("routines.managed.reconcile", Some("routines.managed")),
    ("routines.managed.reset", Some("routines.managed")),
    ("routines.managed.update", Some("routines.managed")),
    ("routines.managed.run", Some("routines.managed")),
    ("skills.managed.get", Some("skills.managed")),
    ("skills.managed.reconcile", Some("skills.managed")),
    ("skills.managed.reset", Some("skills.managed")),
    ("issues.list", Some("issues.read")),
    ("issues.get", Some("issues.read")),
    ("issues.create", Some("issues.create")),
    ("issues.update", Some("issues.update")),
    ("issues.relations.get", Some("issue.relations.read")),
    (
        "issues.relations.setBlockedBy",
        Some("issue.relations.write"),
    ),
    (
        "issues.relations.addBlockers",
        Some("issue.relations.write"),
    ),
    (
        "issues.relations.removeBlockers",
        Some("issue.relations.write"),
    ),
    ("issues.assertCheckoutOwner", Some("issues.checkout")),
    ("issues.getSubtree", Some("issue.subtree.read")),
    ("issues.requestWakeup", Some("issues.wakeup")),
    ("issues.requestWakeups", Some("issues.wakeup")),
    (
        "issues.summaries.getOrchestration",
        Some("issues.orchestration.read"),
    ),
    ("issues.listComments", Some("issue.comments.read")),
    ("issues.createComment", Some("issue.comments.create")),
    (
        "issues.createInteraction",
        Some("issue.interactions.create"),
    ),
    ("issues.listInteractions", Some("issue.interactions.read")),
    (
        "issues.respondInteraction",
        Some("issue.interactions.respond"),
    ),
    ("issues.listAttachments", Some("issue.attachments.read")),
    (
        "issues.getAttachmentContent",
        Some("issue.attachments.read"),
    ),
    ("approvals.list", Some("approvals.read")),
    ("approvals.get", Some("approvals.read")),
    ("approvals.decide", Some("approvals.respond")),
    ("issues.documents.list", Some("issue.documents.read")),
    ("issues.documents.get", Some("issue.documents.read")),
    ("issues.documents.upsert", Some("issue.documents.write")),
    ("issues.documents.delete", Some("issue.documents.write")),
    ("agents.list", Some("agents.read")),
    ("agents.get", Some("agents.read")),
    ("agents.pause", Some("agents.pause")),
    ("agents.resume", Some("agents.resume")),
    ("agents.invoke", Some("agents.invoke")),
    ("agents.managed.get", Some("agents.managed")),
    ("agents.managed.reconcile", Some("agents.managed")),
    ("agents.managed.reset", Some("agents.managed")),
    ("agents.sessions.create", Some("agent.sessions.create")),
    ("agents.sessions.list", Some("agent.sessions.list")),
    ("agents.sessions.sendMessage", Some("agent.sessions.send")),
    ("agents.sessions.close", Some("agent.sessions.close")),
    ("goals.list", Some("goals.read")),
    ("goals.get", Some("goals.read")),
    ("goals.create", Some("goals.create")),
    ("goals.update", Some("goals.update")),
    ("access.members.list", Some("access.members.read")),
    ("access.members.get", Some("access.members.read")),
    ("access.members.update", Some("access.members.write")),
    ("access.invites.list", Some("access.invites.read")),
    ("access.invites.create", Some("access.invites.write")),
    ("access.invites.revoke", Some("access.invites.write")),
    (
        "authorization.grants.list",
        Some("authorization.grants.read"),
    ),
    (
        "authorization.grants.set",
        Some("authorization.grants.write"),
    ),
    (
        "authorization.policies.summary",
        Some("authorization.policies.read"),
    ),
    (
        "authorization.policies.get",
        Some("authorization.policies.read"),
    ),
    (
        "authorization.policies.update",
        Some("authorization.policies.write"),
    ),
    (
        "authorization.policies.previewAssignment",
        Some("authorization.policies.read"),
    ),
    (
        "authorization.policies.explainAssignment",
        Some("authorization.policies.read"),
    ),
    (
        "authorization.audit.search",
        Some("authorization.audit.read"),
    ),
];

/// The capability upstream requires for `method`: `None` when the method is
/// unknown to upstream, `Some(None)` when it needs none.
pub(crate) fn required_capability(method: &str) -> Option<Option<&'static str>> {
    UPSTREAM_HOST_METHODS
        .iter()
        .find(|(m, _)| *m == method)
        .map(|(_, c)| *c)
}
