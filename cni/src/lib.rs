//! Pod networking: CNI and TC-filter redirection. Not built yet (issue 5).
#![forbid(unsafe_code)]
