//! Calls held for a human: waiting for a decision through the approvals queue
//! (the admin page and API, with a webhook) or by asking the client's own user
//! (elicitation). The pending approvals themselves live in
//! [`crate::store::approvals`]; what happens once a call is approved is the
//! core's (`pipeline::held`).

pub mod elicit;
pub mod hold;
pub mod webhook;
