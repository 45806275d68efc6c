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
//! | `strategy` | `CacheAside` (a failing cache is skipped), `ReadThrough` (a failing cache fails the call, when the error type is `From<CacheError>`), `WriteBehind` (the result is cached in the background), `WriteAround` (results are not cached); `WriteThrough` is refused (a write strategy) | `CacheAside` |
//! | `key` | an expression over the arguments whose `Display` form is the key's argument part (required on generic functions; longer than 200 bytes, beginning with `#` or holding a NUL, it is replaced by `#` + its 128-bit xxh3 hash, as long arguments are) | the arguments as canonical JSON |
//! | `name` | a string: the loader name used in keys and stats | the function's path |
//! | `cache_none` | `true` / `false`: also cache `None` (functions returning `Option<T>`) | `false` |
//! | `mode` | `result` (cache `Ok` only), `option` (cache `Some` only), `value` (cache what is returned) | from the return type |
//!
//! **What is cached** follows the return *type*, whatever name it is written with (a type
//! alias included): `Result<T, E>` caches only `Ok`; `Option<T>` caches `Some` (and `None`
//! with `cache_none = true`); any other owned type is always cached. `mode = ...` forces one.
//!
//! **Keys** are `loader:{name}:{arguments}`: `name` is `{module_path!()}::{fn}` for a
//! function and `{module_path!()}::{Type}::{method}` for a method (the `impl`'s module, `Type`
//! as written; a generic `Self` adds its type arguments as `type_name` prints them, so each
//! instantiation has its own keys), and the arguments are canonical JSON
//! (`loader:app::users::get_user:[42]`). For those, nothing comes from the compiler's name of
//! the function, so keys survive a toolchain upgrade. Where that name would be shared — an
//! associated function in an `impl` block (`impl User { fn get }` beside `impl Order { fn get }`),
//! a method of a trait impl (the trait is added: `app::Pg as app::UserRepo::find`) — the
//! compiler's path is used, which a toolchain may print differently: give `name = ...` where
//! keys must never change. Two types of the same name from different modules whose methods are
//! implemented in one module (`mod c { impl a::Repo {..} impl b::Repo {..} }`) share
//! `c::Repo::method` keys: give one of them `name = ...`. A generic function needs `key = ...` (otherwise every
//! instantiation would share one key); so does an associated function of a generic `impl`
//! (the macro cannot see the impl's parameters). A return type that is a bare type parameter
//! needs `mode = ...`.
//!
//! **Failures are shared**: concurrent callers of one key run the body once; when it fails,
//! every caller that waited gets its error — a clone when `E: Clone`, or
//! `E::from(CacheError)` carrying the leader's message when `E: From<CacheError> + Display`
//! (`anyhow::Error`, boxed errors) — so a failing database sees one call per key, not one per
//! caller. Only an error type that is neither makes each waiter run its own call (return
//! `Arc<E>` to avoid that). With `strategy = ReadThrough`, a failing cache fails the call
//! when the error type is `From<CacheError>`; otherwise the call goes on without the cache.

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
