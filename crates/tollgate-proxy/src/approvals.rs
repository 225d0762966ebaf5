//! Calls held for a human: waiting for a decision through the approvals queue
//! (the admin page and API, with a webhook) or by asking the client's own user
//! (elicitation); deciding, with the call checked again against the policy in
//! force; and the `requestState` of stateless-era retries. The approvals and
//! grants themselves live in [`crate::store::approvals`]; what happens once a
//! call may go on is the core's (`pipeline::held`).

pub mod decide;
pub mod elicit;
pub mod hold;
pub mod state;
pub mod webhook;
