//! The StorageLUN controller.

pub mod failover;
pub mod replicas;

/// Event notes are limited to 1 KiB by the API server.
pub fn truncate_note(note: &str) -> String {
    const MAX: usize = 1024;
    if note.len() <= MAX {
        return note.to_string();
    }
    let mut end = MAX - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}
