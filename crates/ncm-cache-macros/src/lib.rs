//! # ncm-cache-macros
//!
//! Attribute macros that play the role of the original Python decorators
//! `@loader.cache_loader(...)` and `@loader.cache_method(...)`. Use them through
//! [`ncm-cache-loader`](https://docs.rs/ncm-cache-loader) (feature `macros`, on by default),
//! which re-exports them and provides the runtime the generated code calls; this crate cannot
//! be used on its own.
//!
//! ```text
//! #[cache_loader(loader = LOADER, ttl = "1h", strategy = ReadThrough)]
//! async fn get_user_profile(user_id: u64) -> Result<Profile, DbError> { ... }
//!
//! impl UserService {
//!     #[cache_method(loader = self.loader, ttl = 1800, key = format!("email:{email}"))]
//!     async fn get_user_by_email(&self, email: &str) -> Result<User, DbError> { ... }
//! }
//! ```
//!
//! Options (all `name = value`, comma separated):
//!
//! | option | value | default |
//! |---|---|---|
//! | `loader` | the `CacheLoader` (a static, a `LazyLock`, `self.field`, a call returning `&CacheLoader`, ...) | required |
//! | `ttl` | seconds (`1800`, `0.5`), a duration string (`"30m"`, `"1h 30m"`), or a `Duration` expression | the loader's `default_ttl` |
//! | `strategy` | a `CacheStrategy` variant (`ReadThrough`, `CacheStrategy::WriteBehind`, `"write_around"`) | `CacheAside` |
//! | `key` | an expression over the arguments whose `Display` form is the key's argument part | the arguments as canonical JSON |
//! | `name` | a string: the loader name used in keys and stats | the function's path |
//! | `cache_none` | `true` / `false`: also cache `None` (functions returning `Option<T>`) | `false` |
//!
//! The return type decides what is cached: `Result<T, E>` (or an alias whose name ends in
//! `Result`) caches only `Ok`; `Option<T>` caches `Some` (and `None` with `cache_none = true`);
//! any other owned type is always cached.

mod expand;
mod options;

use proc_macro::TokenStream;

use crate::expand::{Kind, expand};

/// On misuse, emits the error next to the untouched function so that its callers still
/// compile and the error is the only one reported.
fn run(kind: Kind, attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    match expand(kind, attr.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        Err(err) => {
            let err = err.into_compile_error();
            quote::quote!(#err #item).into()
        }
    }
}

/// Caches an `async fn` without `self` through a `CacheLoader`: the key is the function's path
/// plus its arguments (or `key = ...`), concurrent calls with the same key run the body once,
/// and `Err` / `None` results are not cached. See the crate docs for the options.
#[proc_macro_attribute]
pub fn cache_loader(attr: TokenStream, item: TokenStream) -> TokenStream {
    run(Kind::Function, attr, item)
}

/// Caches an `async` method: like [`cache_loader`], with `self` left out of the key (the
/// method's path, including its type, is part of it). `loader = self.field` reads the loader
/// from the receiver.
#[proc_macro_attribute]
pub fn cache_method(attr: TokenStream, item: TokenStream) -> TokenStream {
    run(Kind::Method, attr, item)
}
